"""
HTTP apps: thin Bottle handlers that parse and validate requests, then call
plain Python objects (sessions, ops, backends) that know nothing of HTTP.
"""
