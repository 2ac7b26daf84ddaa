"""PyTorch drop-ins: our exact, fast kernels as ``torch.nn`` batch-norm modules.

Needs torch (``pip install 'batchnorm[torch]'``).
"""
