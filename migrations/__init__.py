"""loraplex's Alembic migrations (``env.py``, ``script.py.mako``, ``versions/``).

A package so that it ships inside the installed distribution: ``service.db.migrate`` finds
it through the import system, wherever loraplex is installed (wheel, editable or a source
checkout). ``alembic.ini`` at the repository root points here for developers.
"""
