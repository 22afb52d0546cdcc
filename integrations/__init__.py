"""integrations -- LongAct inside other training libraries (optional; integrations/README.md).

Import the one you use, e.g. `from integrations.trl_longact import LongActCallback`.
"""
