"""Every test suite in the repository (tests/, integrations/*/tests) shares the fixtures of one plugin.

The plugin is loaded here, in the root conftest, because pytest accepts ``pytest_plugins`` only in a top-level
conftest: the integrations' conftests are not top-level when pytest runs from the repository's root.
"""

pytest_plugins = ["cacheblend_rag.testing"]
