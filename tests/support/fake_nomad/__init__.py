"""A small, faithful fake Nomad client agent HTTP API for black-box tests (see CONTRACT.md).

server.py (with state.py, shapes.py, acl.py; stdlib only) is runnable as a script;
client.py has a stdlib-only helper to start it and drive its /_control/ API.
"""
