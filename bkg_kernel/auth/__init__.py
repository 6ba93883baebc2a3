"""Auth, in the core: users, roles, scopes, API keys, sessions, the audit log and usage, and the principal
(`Principal`) that every call carries from the gateway into the plugins. The `apikeys` plugin is its panel."""

from bkg_kernel.auth.principal import BUILTIN_ROLES, SCOPES, Principal
from bkg_kernel.auth.service import AuthService

__all__ = ["BUILTIN_ROLES", "SCOPES", "AuthService", "Principal"]
