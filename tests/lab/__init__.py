"""The test lab: network namespaces (netns.py) and a connection farm (farm.py)
that the kernel tests use to make real TCP connections and watch what happens
to them."""
