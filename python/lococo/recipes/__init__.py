"""What the ``lococo`` command runs: assets, training, evaluation, the demo and the showcase."""
