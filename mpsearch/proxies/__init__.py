"""Proxies: expressions that predict the loss increase of quantizing one tensor."""

from mpsearch.proxies.expr import Expression, ExpressionError, parse
from mpsearch.proxies.proxy import PRIMITIVE_NAMES, Proxy, ProxyFileError, list_proxies, load_proxy

__all__ = [
    "Expression",
    "ExpressionError",
    "parse",
    "Proxy",
    "ProxyFileError",
    "load_proxy",
    "list_proxies",
    "PRIMITIVE_NAMES",
]
