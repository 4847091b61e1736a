"""Analyses of training runs: parameter shift, untouched weights, gradient-weight correlation."""
