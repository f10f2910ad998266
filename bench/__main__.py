"""`make bench`: run every benchmark and print its ratios."""

from bench import hooks, sweep, vocab_circuits

if __name__ == "__main__":
    hooks.main()
    sweep.main()
    vocab_circuits.main([])
