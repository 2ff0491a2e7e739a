"""The test bench: what the tests, the benchmarks and the demo run on, shared by all three.

- `testbench.topology`: the daemons' sockets, bridges and addresses, from
  ``scripts/topology.env`` (the one place they are written).
- `testbench.hubtools`: a real JupyterHub behind a real configurable-http-proxy, driven
  through its REST API.
- `testbench.cluster`: the API side of ``scripts/cluster.sh`` (members, trust, images),
  through lxdspawner's own client, and the `Cluster` its ``up`` describes.

Not part of the installed package: import it from the repository's root (pytest does, by
its ``pythonpath = ["."]``; the benchmark runs as ``python -m benchmarks.spawn`` there).
"""
