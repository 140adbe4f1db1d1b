"""The CPU (and any-device) PyTorch / C++ paths of the op families, one module per family.

``ops/<family>.py`` holds a family's Triton kernels, launchers, routing op and public functions;
``ops/cpu/<family>.py`` its PyTorch (or C++ extension) implementation, registered with
``_registration.torch_op`` so that ``torch.compile`` sees one opaque op.  See docs/architecture.md.
"""
