"""What the demo, the tests and the benchmarks train on, kept off the product path (the audit and
correct flows never import it): scikit-learn's digits with injected label noise (`digits`) and
the small classifiers trained on them (`models`)."""
