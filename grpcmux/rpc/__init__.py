"""Everything grpcio: the proxy endpoint, Discovery, and the reactor/thread crossings.

:class:`grpcmux.rpc.service.ProxyService` is the entry point.
"""
