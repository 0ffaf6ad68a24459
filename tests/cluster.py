"""The loopback cluster the drills use lives in the package (``nalar.bus.cluster``): benchmarks use it too."""
from nalar.bus.cluster import NatsCluster, free_ports, list_streams, stream_info, stream_leader, wait_jetstream

__all__ = ["NatsCluster", "free_ports", "list_streams", "stream_info", "stream_leader", "wait_jetstream"]
