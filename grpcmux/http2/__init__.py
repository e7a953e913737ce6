"""The proxy endpoint's HTTP/2 router: frames and header blocks, no gRPC.

``frames`` is the codec (RFC 9113 section 4 and 6); the router terminates HTTP/2
framing per connection and forwards streams between caller connections and
upstream connections (a client's tunnel, the local grpcio services, another node).
"""
