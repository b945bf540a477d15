"""``python -m cacheblend_rag.cli``: the same as the ``cacheblend`` command."""

from . import main

if __name__ == "__main__":
    main()
