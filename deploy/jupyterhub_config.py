# JupyterHub for a bkg team: one shared gateway (one store, one set of loaded models) as a Hub-managed service,
# Hub logins everywhere, bkg rights from Hub groups.
#
#   bkg hub --dummy-auth --admin alice --developer bob     # a local trial on 127.0.0.1 (any password)
#   jupyterhub -f deploy/jupyterhub_config.py              # the same config, for a real deployment
#
# What it sets up:
# - the gateway as the managed service `bkg`: the Hub starts it (`bkg serve`), restarts it when it exits, and its
#   proxy routes /services/bkg/ to it. The gateway then accepts Hub tokens and Hub OAuth logins (no second
#   password), and maps the Hub user `ana` to the bkg user `ana@hub`, created on first sight;
# - custom scopes custom:bkg:admin and custom:bkg:developer, given by roles to the Hub groups bkg-admins and
#   bkg-developers (and to the Hub admins); everyone else with access is a bkg viewer;
# - access to the service for every user (the built-in `user` role is only ["self"]);
# - the service reads users' admin flag, roles and groups (role bkg-service): before a scheduled run acts as its
#   owner, the gateway checks that the Hub still sees them as when their bkg role was derived;
# - each user's server (JupyterLab with the bkg extension, Voila) and its kernels reach the gateway as that user:
#   their JUPYTERHUB_API_TOKEN carries the bkg scopes they hold, and finds the gateway through the Hub's API.
#
# Knobs (environment variables; `bkg hub` sets them): BKG_HUB_DATA_DIR (the gateway's data dir), BKG_HUB_STATE_DIR
# (the Hub's database, cookie secret, pid file), BKG_HUB_PORT / BKG_HUB_HUB_PORT / BKG_HUB_PROXY_API_PORT /
# BKG_HUB_GATEWAY_PORT, BKG_HUB_PLUGINS (the gateway's plugins; default all), BKG_HUB_POLL_S (how often the Hub
# checks that the gateway and users' servers still run), BKG_HUB_ADMINS and BKG_HUB_DEVELOPERS (comma-separated Hub
# user names), BKG_HUB_DUMMY_AUTH=1 (JupyterHub's dummy authenticator, for a trial only), BKG_HUB_NOTEBOOK_DIR (the
# users' servers' root in a trial), BKG_HUB_CHP (the configurable-http-proxy command).
# For a real deployment set your authenticator (OAuthenticator, LDAP, ...) and manage groups in the Hub instead.
import os
import shutil
import sys
from pathlib import Path

from bkg_kernel.hub import with_hub
from bkg_kernel.kernels import LAB_KERNEL_MANAGER

c = get_config()  # noqa: F821  (JupyterHub provides get_config when it loads this file)

env = os.environ.get
state_dir = Path(env("BKG_HUB_STATE_DIR", "jupyterhub-state")).resolve()
try:
    state_dir.mkdir(parents=True, exist_ok=True)
except OSError as exc:  # a file in the way: one line (the Hub shows a config's exceptions as a traceback)
    raise SystemExit(
        f"cannot use {state_dir} as the Hub's state dir (BKG_HUB_STATE_DIR): {exc.strerror or exc}"
    ) from None
data_dir = Path(env("BKG_HUB_DATA_DIR", "data")).resolve()
gateway_port = int(env("BKG_HUB_GATEWAY_PORT", "43119"))
gateway_url = f"http://127.0.0.1:{gateway_port}"
admins = [n for n in env("BKG_HUB_ADMINS", "").split(",") if n]
developers = [n for n in env("BKG_HUB_DEVELOPERS", "").split(",") if n]

# -- the Hub on this machine -------------------------------------------------------------------------------------
c.JupyterHub.bind_url = f"http://127.0.0.1:{env('BKG_HUB_PORT', '8000')}"
c.JupyterHub.hub_bind_url = f"http://127.0.0.1:{env('BKG_HUB_HUB_PORT', '8081')}"
c.ConfigurableHTTPProxy.api_url = f"http://127.0.0.1:{env('BKG_HUB_PROXY_API_PORT', '8001')}"
c.JupyterHub.db_url = f"sqlite:///{state_dir / 'jupyterhub.sqlite'}"
c.JupyterHub.cookie_secret_file = str(state_dir / "jupyterhub_cookie_secret")
c.JupyterHub.pid_file = str(state_dir / "jupyterhub.pid")
c.ConfigurableHTTPProxy.pid_file = str(state_dir / "proxy.pid")
# configurable-http-proxy comes from npm: the bkg set-up installs it next to the Python environment.
chp = env("BKG_HUB_CHP") or str(Path(sys.prefix) / "node" / "node_modules" / ".bin" / "configurable-http-proxy")
if not Path(chp).exists():
    chp = shutil.which("configurable-http-proxy") or chp
# The Hub starts its proxy and the gateway in sessions of their own and stops them when it exits; `with_hub` runs each
# under a small follower that stops it when the Hub dies without doing so (SIGKILL, a crash, the OOM killer), so
# neither keeps the public port or the data dir's lock from the next Hub.
c.ConfigurableHTTPProxy.command = with_hub([chp])

# -- the bkg gateway as a managed service --------------------------------------------------------------------------
gateway_command = [sys.executable, "-m", "bkg_kernel.cli", "serve", "--data-dir", str(data_dir), "--host", "127.0.0.1",
                   "--port", str(gateway_port)]  # fmt: skip
if env("BKG_HUB_PLUGINS"):
    gateway_command += ["--plugins", env("BKG_HUB_PLUGINS", "")]
c.JupyterHub.services = [
    {
        "name": "bkg",
        "url": gateway_url,
        "command": with_hub(gateway_command),
        "environment": {k: v for k, v in os.environ.items() if k.startswith("BKG_") and not k.startswith("BKG_HUB_")},
        "oauth_no_confirm": True,  # logging in to bkg through the Hub asks nothing more
        "oauth_client_allowed_scopes": ["custom:bkg:admin", "custom:bkg:developer"],
    }
]
c.JupyterHub.custom_scopes = {
    "custom:bkg:admin": {"description": "bkg admin: everything, including users, keys and the audit log."},
    "custom:bkg:developer": {"description": "bkg developer: use and operate plugins, collections and jobs."},
}
c.JupyterHub.load_groups = {
    "bkg-admins": {"users": admins},
    "bkg-developers": {"users": developers},
}
c.JupyterHub.load_roles = [
    # every user may reach the bkg service (as a viewer unless a group below says more)
    {"name": "user", "scopes": ["self", "access:services!service=bkg", "read:services!service=bkg"]},
    {"name": "bkg-developer", "scopes": ["custom:bkg:developer"], "groups": ["bkg-developers"]},
    {"name": "bkg-admin", "scopes": ["custom:bkg:admin", "custom:bkg:developer"], "groups": ["bkg-admins"]},
    # the gateway reads a user's admin flag, roles and groups (never their tokens) before a run acts as them: a
    # scheduled notebook of someone who left a group or the Hub does not start with the rights they had
    {
        "name": "bkg-service",
        "scopes": ["read:users:groups", "read:roles:users", "read:roles:groups"],
        "services": ["bkg"],
    },
]
c.Authenticator.admin_users = set(admins)
# the Hub restarts the gateway when it finds it gone; it looks this often (managed services use this spawner)
c.LocalProcessSpawner.poll_interval = int(env("BKG_HUB_POLL_S", "30"))

# -- users' servers: JupyterLab with the bkg extension, acting as their user ---------------------------------------
c.Spawner.cmd = [sys.executable, "-m", "jupyterhub.singleuser"]  # this environment's Jupyter, bkg included
c.Spawner.default_url = "/lab"
# kernels over Unix sockets in a folder only their user can enter (bkg_kernel/kernels.py): on a shared machine a
# kernel on TCP 127.0.0.1 is reachable by every user, and a port picked for one kernel can be taken by another's
c.Spawner.args = [LAB_KERNEL_MANAGER]
# bkg.connect() in a user's server finds the gateway through the Hub's API (read:services!service=bkg)
c.Spawner.environment = {"BKG_LAB_START_GATEWAY": "0"}
c.Spawner.server_token_scopes = [
    "users:activity!user",
    "access:servers!server",
    "access:services!service=bkg",
    "read:services!service=bkg",
    "custom:bkg:admin",  # each token gets only the scopes its user holds
    "custom:bkg:developer",
]

if env("BKG_HUB_DUMMY_AUTH") == "1":  # a local trial: any user name, any password
    c.JupyterHub.authenticator_class = "dummy"
    c.Authenticator.allow_all = True
    c.JupyterHub.spawner_class = "simple"  # every user's server as this OS user, in their own folder
    c.Spawner.notebook_dir = env("BKG_HUB_NOTEBOOK_DIR", os.getcwd())
    if os.geteuid() == 0:  # a container or CI machine running as root: Jupyter refuses root without this
        c.Spawner.args = [*c.Spawner.args, "--allow-root"]
