"""`make bench`: run every benchmark and print its ratios."""

from bench import hooks

if __name__ == "__main__":
    hooks.main()
