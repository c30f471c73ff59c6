"""python -m resure_ds.config: every option's table, as docs/configuration.md holds it."""
from . import markdown_table

print(markdown_table())
