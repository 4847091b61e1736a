"""The nanoadam lab: the baselines registry, the experiments and analyses that reproduce the paper,
the benchmarks and the ``nanoadam`` command line. It builds on the library (``nanoadam``), which
never imports it; its own dependencies come with the ``experiments`` extra."""
