"""`make bench`: run every benchmark and print its ratios."""

from bench import hooks, vocab_circuits

if __name__ == "__main__":
    hooks.main()
    vocab_circuits.main([])
