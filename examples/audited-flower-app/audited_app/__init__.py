"""A plain Flower PyTorch app (MNIST digits, a small CNN, FedAvg), audited by fedleak."""
