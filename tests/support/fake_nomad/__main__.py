"""python3 -m tests.support.fake_nomad (from the repository root) == python3 tests/support/fake_nomad/server.py"""
import sys

try:
    from .server import main
except ImportError:  # run as a plain directory: python3 tests/support/fake_nomad
    import os

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from server import main  # type: ignore

sys.exit(main())
