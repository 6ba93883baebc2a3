"""Real text corpora that ship with Python, for examples, tests and benchmarks (no download).

`python_docs()` collects the docstrings of modules, classes, functions and methods of installed packages (the
standard library by default): real technical English with a natural label (the package it documents).
`PYDOC_QUERIES` is a small labelled query set over it, for retrieval quality (nDCG@10, recall@10);
`PYDOC_TUNING` a second one, written for tuning (fusion weights), so that `PYDOC_QUERIES` stays held out.

`python_code()` is a second corpus, labelled by the people who wrote the code rather than by us: CodeSearchNet's
construction (Husain et al., 2019) over the standard library's own source. Each documented function is a
document (its source, docstring removed) and the first sentence of its docstring is a query whose one relevant
document is that function.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import math
import pkgutil
import re
import sys
import textwrap
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

# Standard-library packages with plenty of documented API and no side effects on import.
_STDLIB = (
    "abc argparse array ast asyncio base64 bisect calendar collections concurrent configparser contextlib copy csv "
    "dataclasses datetime decimal difflib email enum fileinput fnmatch fractions ftplib functools getopt gettext glob "
    "gzip hashlib heapq hmac html http imaplib inspect io ipaddress itertools json logging lzma mailbox math "
    "mimetypes multiprocessing numbers operator optparse os pathlib pickle pkgutil plistlib poplib posixpath pprint "
    "queue random re sched secrets selectors shelve shlex shutil signal smtplib socket socketserver sqlite3 "
    "statistics string struct subprocess tarfile tempfile textwrap threading timeit tokenize traceback types typing "
    "unittest urllib uuid warnings weakref wsgiref xml xmlrpc zipfile zlib zoneinfo"
)
STDLIB = tuple(_STDLIB.split())


# A labelled query set over `python_docs()` (written by hand, before any tuning): each query with the ids of the
# documents that answer it. The first 28 paraphrase (few words shared with the answer), the rest use its words.
PYDOC_QUERIES: list[tuple[str, list[str]]] = [
    # paraphrases: the words differ from the docstring
    ("turn a Python object into a JSON string", ["json.dumps"]),
    ("read JSON text and get Python objects back", ["json.loads"]),
    ("recursively copy a whole directory tree", ["shutil.copytree"]),
    ("delete a folder and everything inside it", ["shutil.rmtree"]),
    ("create a directory and any missing parents", ["os.makedirs"]),
    ("remove common leading indentation from every line", ["textwrap.dedent"]),
    ("cache the results of a function call", ["functools.lru_cache"]),
    ("count how many times each item occurs", ["collections.Counter"]),
    ("make a temporary folder", ["tempfile.mkdtemp"]),
    ("run an external program and wait until it finishes", ["subprocess.run"]),
    ("middle value of a list of numbers", ["statistics.median"]),
    ("the n biggest items of a dataset", ["heapq.nlargest"]),
    ("percent-encode a string for use in a URL", ["urllib.parse.quote"]),
    ("compare two sequences and measure how similar they are", ["difflib.SequenceMatcher"]),
    ("run several coroutines concurrently and collect their results", ["asyncio.tasks.gather"]),
    ("give up on an awaitable after a number of seconds", ["asyncio.tasks.wait_for"]),
    ("are two floating point numbers approximately equal", ["math.isclose"]),
    ("copy an object including all nested objects", ["copy.deepcopy"]),
    ("generate a random hexadecimal token for security", ["secrets.token_hex"]),
    ("guess the content type of a file from its name", ["mimetypes.guess_type"]),
    ("escape special characters so text is safe in a web page", ["html.escape"]),
    ("walk through all directories below a root", ["os.walk"]),
    ("priority queue where the lowest entry comes out first", ["queue.PriorityQueue"]),
    ("pick a random element with weights", ["random.Random.choices"]),
    ("normal distribution random number", ["random.Random.gauss"]),
    ("current local date and time", ["datetime.datetime.now"]),
    ("set up basic logging to the console", ["logging.basicConfig"]),
    ("unpack every member of an archive to disk", ["tarfile.TarFile.extractall"]),
    # keywords: the words (or the name) appear in the docstring
    ("urlencode query", ["urllib.parse.urlencode"]),
    ("fnmatch shell-style pattern", ["fnmatch.fnmatch"]),
    ("glob pathname pattern", ["glob.glob"]),
    ("gzip open compressed file", ["gzip.open"]),
    ("zlib compress bytes", ["zlib.compress"]),
    ("ZipFile read and write zip files", ["zipfile.ZipFile"]),
    ("itemgetter callable", ["operator.itemgetter"]),
    ("suppress specified exceptions", ["contextlib.suppress"]),
    ("dataclass asdict", ["dataclasses.asdict"]),
    ("WeakValueDictionary", ["weakref.WeakValueDictionary"]),
    ("ip_address IPv4Address IPv6Address", ["ipaddress.ip_address"]),
    ("capwords", ["string.capwords"]),
    ("Sniffer deduce CSV format", ["csv.Sniffer"]),
    ("uuid1 host ID sequence number", ["uuid.uuid1"]),
    ("RLock reentrant lock", ["threading.RLock"]),
    ("format_exception traceback", ["traceback.format_exception"]),
    ("fromisocalendar", ["datetime.date.fromisocalendar"]),
    ("blobopen", ["sqlite3.Connection.blobopen"]),
]


# A second labelled set over `python_docs()`, for tuning only (fusion method and weight in bench/fusion.py), so
# that PYDOC_QUERIES stays held out. Half paraphrases, half keywords, none on a PYDOC_QUERIES answer.
PYDOC_TUNING: list[tuple[str, list[str]]] = [
    ("split a file path into the folder part and the last component", ["posixpath.split"]),
    ("get the extension of a file name", ["posixpath.splitext"]),
    ("pick k distinct items at random without replacement", ["random.Random.sample"]),
    ("turn raw bytes into printable base64 text", ["base64.b64encode"]),
    ("break a long paragraph into lines no wider than a limit", ["textwrap.wrap", "textwrap.fill"]),
    ("every way to choose r items from a collection, order ignored", ["itertools.combinations"]),
    ("combine several already sorted inputs into one sorted stream", ["heapq.merge"]),
    ("load a table from a comma separated file into a DataFrame", ["pandas.read_csv"]),
    ("block until another thread signals a flag", ["threading.Event.wait"]),
    ("arithmetic average of some numbers", ["statistics.mean", "statistics.fmean"]),
    ("spread of data around the mean for a sample", ["statistics.stdev", "statistics.variance"]),
    ("join two tables on shared key columns like SQL", ["pandas.DataFrame.merge"]),
    ("download the contents of a URL to a local file", ["urllib.request.urlretrieve"]),
    ("list the files in a folder as path objects", ["pathlib.Path.iterdir"]),
    ("an evenly spaced sequence of numbers in an interval", ["numpy.arange"]),
    ("number of ways to pick k things from n", ["math.comb"]),
    ("drop the rows that have missing values", ["pandas.DataFrame.dropna"]),
    ("b64decode", ["base64.b64decode"]),
    ("NamedTemporaryFile", ["tempfile.NamedTemporaryFile"]),
    ("move_to_end OrderedDict", ["collections.OrderedDict.move_to_end"]),
    ("limit_denominator closest Fraction", ["fractions.Fraction.limit_denominator"]),
    ("Decimal quantize exponent rounding", ["decimal.Decimal.quantize"]),
    ("groupby DataFrame", ["pandas.DataFrame.groupby"]),
    ("ip_network IPv4Network IPv6Network", ["ipaddress.ip_network"]),
    ("formataddr realname email address", ["email.utils.formataddr"]),
    ("monthdatescalendar weeks", ["calendar.Calendar.monthdatescalendar"]),
    ("median_grouped interpolation", ["statistics.median_grouped"]),
    ("fsum floating point sum", ["math.fsum"]),
    ("HTTPResponse getheader", ["http.client.HTTPResponse.getheader"]),
    ("Path rglob recursive pattern", ["pathlib.Path.rglob"]),
]


def _modules(packages: Iterable[str]) -> Iterator[Any]:
    for name in packages:
        try:
            top = importlib.import_module(name)
        except Exception:  # noqa: S112 - an optional package that does not import is simply not in the corpus
            continue
        yield top
        for info in pkgutil.walk_packages(getattr(top, "__path__", []), prefix=name + ".", onerror=lambda _: None):
            if any(part.startswith("_") or part in ("tests", "test", "__main__") for part in info.name.split(".")):
                continue
            try:
                yield importlib.import_module(info.name)
            except Exception:  # noqa: S112
                continue


def python_docs(packages: Iterable[str] = STDLIB, *, min_chars: int = 80) -> list[dict[str, Any]]:
    """Return documents `{id, text, metadata: {package, module, kind}}`, one per public docstring.

    `id` is the qualified name (`json.dumps`); `text` starts with that name, then the docstring. Objects
    re-exported from another module are kept once, under the module that defines them.
    """
    docs: dict[str, dict[str, Any]] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for mod in _modules(packages):
            mname = mod.__name__
            pkg = mname.split(".")[0]
            _add(docs, mname, inspect.getdoc(mod), pkg, mname, "module", min_chars)
            for attr, obj in sorted(vars(mod).items()):
                if attr.startswith("_") or getattr(obj, "__module__", None) != mname:
                    continue
                if inspect.isclass(obj):
                    _add(docs, f"{mname}.{attr}", inspect.getdoc(obj), pkg, mname, "class", min_chars)
                    for mattr, meth in sorted(vars(obj).items()):
                        if mattr.startswith("_") or not callable(meth):
                            continue
                        doc = inspect.getdoc(meth)
                        _add(docs, f"{mname}.{attr}.{mattr}", doc, pkg, mname, "method", min_chars)
                elif inspect.isfunction(obj) or inspect.isbuiltin(obj):
                    _add(docs, f"{mname}.{attr}", inspect.getdoc(obj), pkg, mname, "function", min_chars)
    return list(docs.values())


def _add(docs: dict[str, dict[str, Any]], qual: str, doc: str | None, pkg: str, mod: str, kind: str, n: int) -> None:
    if not doc or len(doc) < n or qual in docs:
        return
    meta = {"package": pkg, "module": mod, "kind": kind, "python": f"{sys.version_info[0]}.{sys.version_info[1]}"}
    docs[qual] = {"id": qual, "text": f"{qual}\n\n{doc}", "metadata": meta}


def python_code(
    packages: Iterable[str] = STDLIB, *, queries: int = 200
) -> tuple[list[dict[str, Any]], list[tuple[str, list[str]]]]:
    """Return (documents, labelled queries) for code search over the source of these packages' modules.

    Documents are the functions and methods defined in pure-Python modules (`id` the qualified name, `text`
    a comment line with that name, then the source with its docstring cut out, as a code index holds it); a
    query is the first sentence of a docstring (4 to 30 words, shared by no other function), its relevant
    document the function it documents. `queries` of them are
    kept, spread evenly over the corpus in a fixed order, so every run asks the same ones.
    """
    docs: dict[str, dict[str, Any]] = {}
    summaries: dict[str, list[str]] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for mod in _modules(packages):
            try:
                source = inspect.getsource(mod)
            except (OSError, TypeError):  # a C module: no source
                continue
            try:
                tree = ast.parse(source)
            except SyntaxError:
                continue
            lines = source.splitlines()
            for qual, node in _functions(tree, mod.__name__):
                if qual in docs or node.end_lineno is None:
                    continue
                doc = ast.get_docstring(node)
                body = node.body[1:] if doc else node.body
                if not doc or not body or body[-1].end_lineno is None:
                    continue
                head = lines[node.lineno - 1 : node.body[0].lineno - 1]  # decorators excluded: def line(s)
                code = textwrap.dedent("\n".join(head + lines[body[0].lineno - 1 : body[-1].end_lineno]))
                if code.count("\n") < 2:
                    continue
                pkg = mod.__name__.split(".")[0]
                meta = {"package": pkg, "module": mod.__name__}
                docs[qual] = {"id": qual, "text": f"# {qual}\n{code}", "metadata": meta}
                summary = _first_sentence(doc)
                if 4 <= len(summary.split()) <= 30:
                    summaries.setdefault(summary, []).append(qual)
    unique = sorted((quals[0], s) for s, quals in summaries.items() if len(quals) == 1)
    step = max(1, len(unique) // queries) if queries else 1
    picked = unique[::step][:queries]
    return list(docs.values()), [(s, [qual]) for qual, s in picked]


def _functions(tree: ast.Module, module: str) -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """Public module-level functions and public methods of public module-level classes, with their names."""
    fn = (ast.FunctionDef, ast.AsyncFunctionDef)
    for node in tree.body:
        if isinstance(node, fn) and not node.name.startswith("_"):
            yield f"{module}.{node.name}", node
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            for item in node.body:
                if isinstance(item, fn) and not item.name.startswith("_"):
                    yield f"{module}.{node.name}.{item.name}", item


def _first_sentence(doc: str) -> str:
    para = " ".join(doc.strip().split("\n\n")[0].split())
    m = re.match(r"(.+?[.!?])(\s|$)", para)
    return m.group(1) if m else para


def retrieval_metrics(ranked_doc_ids: list[str], relevant: list[str], k: int = 10) -> tuple[float, float]:
    """nDCG@k and recall@k (binary relevance) of a ranking; repeated documents (several chunks) count once."""
    seen: list[str] = []
    for d in ranked_doc_ids:
        if d not in seen:
            seen.append(d)
    top, rel = seen[:k], set(relevant)
    dcg = sum(1.0 / math.log2(i + 2) for i, d in enumerate(top) if d in rel)
    ideal = sum(1.0 / math.log2(i + 2) for i in range(min(len(rel), k)))
    return (dcg / ideal if ideal else 0.0), (len(rel & set(top)) / len(rel) if rel else 0.0)
