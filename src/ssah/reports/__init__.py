"""What every report shares (no recipe's report lives here; each is ``ssah/recipes/<name>/report.py``): Markdown
tables, proportions and plots (:mod:`.common`), the self-contained HTML page (:mod:`.html`), and the demo's
science table whose rows the recipes register (:mod:`.science`)."""
