"""Jobs: the config schema (``config``), the pipeline (``detection``, ``guard``, ``ddpm``: one function each), the
typed result (``results``) and the store keys (``keys``) of every job kind."""
