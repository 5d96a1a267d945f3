"""Peer libraries (NIXL, Mooncake Transfer Engine) run as benchmark baselines through the same
harness (kvtransfer.bench.harness) as kvtransfer itself. Neither library is imported until a
runner's child process needs it; install them with `pip install -r requirements-peers.txt`."""
