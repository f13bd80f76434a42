"""CIFAR-2 (airplane vs bird) with backpropagation and SGD written by hand, checked against PyTorch."""
