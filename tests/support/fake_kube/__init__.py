"""A small, faithful fake Kubernetes API server for black-box tests (see CONTRACT.md).

server.py is self-contained (stdlib, PyYAML optional) and runnable as a script;
client.py has a stdlib-only helper to start it and drive its /_control/ API.
"""
