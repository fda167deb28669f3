"""The expert-group function: an HTTP server that loads one plan function's experts and computes partial sums.

Run it with ``python -m faasmoe.function`` (settings from FAASMOE_* variables, see settings.py). This
package's modules import torch only in the background loader, so the server listens within a fraction
of a second of process start.
"""
