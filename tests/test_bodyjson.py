"""Request bodies parsed in pieces (`runtime.bodyjson`): the same answer as `json.loads`, arrays over a limit refused
before the rest is read, and what a parse made freed a slice at a time."""

from __future__ import annotations

import json

import pytest

from bkg_kernel.errors import InvalidInput
from bkg_kernel.runtime import bodyjson

DOCS = [
    '{"points": [{"id": 1, "vector": [0.5, 1]}, {"id": "b", "vector": []}], "embed_model": null}',
    ' { "a" : [ ] , "b" : [ 1 , [2, 3] , {"c": [4]} ] , "d" : {"e": [5]} } ',
    '{"x": [1], "x": [2, 3]}',  # a repeated key: the last one wins
    "{}",
    "[1, 2, 3]",
    '"text"',
]


@pytest.mark.parametrize("doc", DOCS)
def test_pieces_parse_as_json_loads_does(doc: str) -> None:
    assert bodyjson.loads_in_pieces(doc) == json.loads(doc)


@pytest.mark.parametrize("doc", ['{"a": [1, 2', '{"a": [1,, 2]}', '{"a": [1]} x', "{1: [2]}", '{"a" [1]}'])
def test_broken_json_is_an_error(doc: str) -> None:
    with pytest.raises(ValueError):
        bodyjson.loads_in_pieces(doc)


def test_an_array_past_its_limit_is_refused_naming_it() -> None:
    doc = json.dumps({"points": list(range(11)), "other": list(range(50))})
    assert bodyjson.loads_in_pieces(doc, max_items={"points": 11})["points"] == list(range(11))
    with pytest.raises(InvalidInput) as err:
        bodyjson.loads_in_pieces(doc, max_items={"points": 10})
    assert err.value.field == "points" and "at most 10 items" in err.value.message
    # the limit is checked as the array is read: what follows the 11th element is never parsed
    with pytest.raises(InvalidInput):
        bodyjson.loads_in_pieces('{"points": [' + "1," * 11 + " this is not JSON", max_items={"points": 10})


def test_release_empties_the_top_level_arrays() -> None:
    inner = [1, 2]
    data = {"points": [{"id": i} for i in range(5000)], "nested": {"keep": inner}, "n": 3, "list": [inner]}
    bodyjson.release(data)
    assert data == {"points": [], "nested": {"keep": [1, 2]}, "n": 3, "list": []}
    items = list(range(10_000))
    bodyjson.release(items)
    assert items == []
    bodyjson.release(None)  # anything else is left as it is


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        (b"[1, 2]", "starts with '[', as an array would"),
        (b'  "text"', "starts with '\"', as a string would"),
        (b"3", "starts with '3', as a number would"),
        (b"null", "starts with 'n', as null would"),
        (b"notjson", "starts with 'n', as null would"),
        (b"  ", "body is empty"),
        (b'{"a": [1, 2', "not valid JSON"),
    ],
)
def test_a_body_must_be_an_object(raw: bytes, words: str) -> None:
    with pytest.raises(InvalidInput) as err:  # a big body: refused by its first character, before it is parsed
        bodyjson.loads(raw + b" " * 70_000)
    assert err.value.field == "body" and words in err.value.message


@pytest.mark.parametrize("pad", [0, 70_000])  # parsed whole, or in pieces (over WHOLE_BYTES): the same answers
def test_loads_caps_arrays_whatever_the_size(pad: int) -> None:
    raw = json.dumps({"input": [1] * 3000, "pad": "x" * pad}).encode()
    with pytest.raises(InvalidInput) as err:
        bodyjson.loads(raw, {"input": 2048})
    assert err.value.field == "input" and err.value.message == "input: List should have at most 2048 items"
    with pytest.raises(InvalidInput) as err:
        bodyjson.loads(raw, {"*": 10})
    assert err.value.field == "input"
    assert bodyjson.loads(raw, {"input": 3000})["input"] == [1] * 3000
    bom = "\ufeff".encode() + raw  # UTF-8 with a BOM, as json.loads takes it
    assert bodyjson.loads(bom)["pad"] == "x" * pad
    assert bodyjson.loads(json.dumps({"a": 1, "pad": "y" * pad}).encode("utf-16"))["a"] == 1


def test_a_long_list_is_encoded_in_slices_into_the_same_json() -> None:
    """`PagedJSONResponse` encodes its list a slice at a time (so the event loop gets the interpreter lock between
    slices): the bytes read back as the whole answer, with the other fields, an empty list, a quote in the field's
    name and an integer past 64 bits (encoded by the standard library in its slice) alike."""
    import json

    from bkg_kernel.gateway.jsonresp import SLICE, PagedJSONResponse

    points = [{"id": i, "vector": [i / 3, -1.5], "payload": {"t": f'"{i}"\n'}} for i in range(SLICE * 3 + 7)]
    points[SLICE + 1]["payload"]["big"] = 2**70
    for content, field in [
        ({"points": points, "next_offset": 42}, "points"),
        ({"results": points}, "results"),
        ({"took_ms": 1.5, 'we"ird': points[:10], "mode": "text"}, 'we"ird'),
        ({"points": [], "next_offset": None}, "points"),
    ]:
        assert json.loads(PagedJSONResponse(content, field).body) == content


def test_a_big_body_goes_to_a_worker_beside_its_pickle() -> None:
    """A `RawJSON` in a message to a worker is not copied into the pickle: its bytes follow as a frame of their own,
    written as they are; every other message is one pickle frame, as before. Both read back whole."""
    import multiprocessing
    import threading

    from bkg_kernel.runtime import pipe
    from bkg_kernel.runtime.bodyjson import RawJSON

    body = b'{"texts": ["' + b"x" * 3_000_000 + b'"]}'
    call = ("invoke", 7, "brainml.index", RawJSON(body), {"caller": {"user_id": "u"}, "grant": "g"})
    framed = pipe.frames(call)
    assert framed[0].startswith(pipe.OOB) and len(framed) == 3 and len(framed[1]) < 1000 and framed[2] == body
    assert len(pipe.frames(("health", 1))) == 1
    a, b = multiprocessing.Pipe()

    def send() -> None:  # a pipe holds ~64 KB: the big frame is read while it is written
        for msg in (call, ("health", 1), call):
            for frame in pipe.frames(msg):
                a.send_bytes(frame)

    writer = threading.Thread(target=send)
    writer.start()
    got = [pipe.recv(b) for _ in range(3)]
    writer.join()
    assert got[1] == ("health", 1)
    for m in (got[0], got[2]):
        assert m[:3] == call[:3] and m[4] == call[4] and isinstance(m[3], RawJSON) and bytes(m[3].raw) == body
        assert m[3].object() == {"texts": ["x" * 3_000_000]}


@pytest.mark.parametrize(
    ("text", "lone"),
    [
        (json.dumps({"a": "\U0001f600 é"}), False),  # a pair, as json.dumps escapes an emoji
        ('{"a": "\\\\ud800"}', False),  # an escaped backslash, then the letters ud800
        ('{"a": "\\\\\\\\ud800"}', False),
        ('{"a": "\\ud800"}', True),
        ('{"a": "\\udc00"}', True),  # a low with no high before it
        ('{"\\ud83d": 1}', True),  # in a key
        ('{"a": "\\ud83d\\u0041"}', True),  # a high, then no low
        ('{"a": "\\ud83d\\ud83d\\ude00"}', True),  # two highs, one low
        ('{"a": "\\ude00\\ud83d"}', True),  # the pair the wrong way round
        ('{"a": "\\\\\\ud800"}', True),  # an escaped backslash, then the escape
        ('{"a": "x\ud800"}', True),  # raw, as a surrogatepass decode leaves one
    ],
)
def test_a_lone_surrogate_is_found_however_it_is_spelled(text: str, lone: bool) -> None:
    if lone:
        with pytest.raises(InvalidInput, match="lone UTF-16 surrogate"):
            bodyjson.check_text(text)
        with pytest.raises(InvalidInput, match="lone UTF-16 surrogate"):
            bodyjson.loads(text.encode("utf-8", "surrogatepass"))
    else:
        bodyjson.check_text(text)
        assert bodyjson.loads(text.encode()) == json.loads(text)
