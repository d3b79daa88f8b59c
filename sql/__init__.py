"""The registry's migrations, ``NNN_name.sql``, applied in order.

Installed as the package ``mcp_node.sql`` (pyproject ``package-dir``); this file
makes it a regular package, which editable installs need to map it here.
"""
