"""apikeys: users, roles, scopes, API keys, sessions and the audit log (inline in the gateway)."""

from bkg_kernel.plugins.apikeys.plugin import ApiKeys

PLUGIN = ApiKeys
__all__ = ["PLUGIN", "ApiKeys"]
