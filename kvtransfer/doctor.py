"""``kvtransfer doctor``: what this host offers kvtransfer, and what it would pick.

Lists the transports built into this copy, the libfabric it loads (the same file the core
would), every libfabric provider for reliable-datagram endpoints with the capabilities the
fabric transport cares about, RDMA (verbs) devices - through pyverbs when installed, else
sysfs - and the choice ``transport="auto"`` makes. ``--selftest`` also moves bytes through each
usable fabric provider on loopback. Also reports the shm segments that killed processes left
in /dev/shm; ``--clean-shm`` removes them (kvtransfer.shm_segments says when not to).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from . import shm_segments, transports


def _verbs_devices() -> list[dict[str, Any]]:
    try:
        from pyverbs.device import Context, get_device_list  # type: ignore[import-not-found]
    except ImportError:
        Context = get_device_list = None  # noqa: N806
    devices: list[dict[str, Any]] = []
    if get_device_list is not None:
        try:
            for d in get_device_list():
                name = d.name.decode() if isinstance(d.name, bytes) else str(d.name)
                entry: dict[str, Any] = {"name": name, "source": "pyverbs"}
                try:
                    with Context(name=name) as ctx:
                        attr = ctx.query_device()
                        entry["ports"] = attr.phys_port_cnt
                        entry["max_mr_size"] = attr.max_mr_size
                except Exception as e:  # noqa: BLE001 - a device we cannot open is still listed
                    entry["error"] = str(e)
                devices.append(entry)
            return devices
        except Exception as e:  # noqa: BLE001
            devices.append({"source": "pyverbs", "error": str(e)})
    for name in transports.rdma_devices():
        entry = {"name": name, "source": "sysfs", "ports": {}}
        ports = f"/sys/class/infiniband/{name}/ports"
        for port in sorted(os.listdir(ports)) if os.path.isdir(ports) else []:
            info = {}
            for key in ("state", "link_layer", "rate"):
                try:
                    with open(f"{ports}/{port}/{key}") as f:
                        info[key] = f.read().strip()
                except OSError:
                    pass
            entry["ports"][port] = info
        devices.append(entry)
    return devices


def _providers(probe: transports._Probe) -> list[dict[str, Any]]:
    """One entry per provider, its domains gathered."""
    by_name: dict[str, dict[str, Any]] = {}
    for p in probe.providers:
        e = by_name.get(p.name)
        if e is None:
            e = p.as_dict()
            e.pop("domain")
            e.pop("fabric")
            e["domains"] = []
            by_name[p.name] = e
        else:
            e["rdma_read"] = e["rdma_read"] or p.rdma_read
            e["hmem"] = e["hmem"] or p.hmem
        if p.domain not in e["domains"]:
            e["domains"].append(p.domain)
    order = {n: i for i, n in enumerate(transports.PROVIDER_PREFERENCE)}
    return sorted(by_name.values(), key=lambda e: order.get(e["name"], len(order)))


def _selftest(provider: str) -> dict[str, Any]:
    import numpy as np

    import kvtransfer as kvt

    t0 = time.perf_counter()
    try:
        with kvt.Endpoint("doctor-a", transport="fabric", provider=provider, timeout=5) as a, \
                kvt.Endpoint("doctor-b", transport="fabric", provider=provider, timeout=5) as b:
            n = 4 << 20
            dst = np.zeros(n, np.uint8)
            src = np.random.default_rng(0).integers(0, 256, n, dtype=np.uint8)
            rd = a.register(dst, remote_write=True, remote_read=True)
            rs = b.register(src)
            peer = b.connect(a.info())
            b.write(peer, rs, rd.id, [[0, 0, n]], notify=b"doctor").wait(5)
            a.wait_notification(b"doctor", timeout=5)
            ok = bool((dst == src).all())
            read = "unsupported"
            if b.caps()["rdma_read"]:
                back = np.zeros(n, np.uint8)
                rb = b.register(back)
                b.read(peer, rb, rd.id, [[0, 0, n]]).wait(5)
                read = "ok" if (back == src).all() else "corrupt"
            return {"provider": provider, "write": "ok" if ok else "corrupt", "read": read,
                    "seconds": round(time.perf_counter() - t0, 3)}
    except Exception as e:  # noqa: BLE001 - reported, not raised
        return {"provider": provider, "error": f"{type(e).__name__}: {e}"}


def report(selftest: bool = False) -> dict[str, Any]:
    """Everything doctor knows, as plain data (JSON-serialisable)."""
    from . import __version__

    probe = transports.probe()
    built = transports.available()
    out: dict[str, Any] = {
        "kvtransfer": __version__,
        "transports_built": built,
        "libfabric": {
            "loaded": probe.path, "version": probe.version, "error": probe.error,
            "search": transports.libfabric_candidates(),
            "env": {k: os.environ[k] for k in (transports.LIBFABRIC_ENV, "FI_PROVIDER",
                                                "KVTRANSFER_FABRIC_DOMAINS",
                                                "KVTRANSFER_FABRIC_HMEM") if k in os.environ},
        },
        "fabric_providers": _providers(probe),
        "verbs_devices": _verbs_devices(),
    }
    auto = transports.choose("auto", None)
    usable = transports.fabric_providers()
    out["pick"] = {
        "auto": {"transport": auto.transport, "provider": auto.provider, "reason": auto.reason},
        "fabric_default": next((p for p in transports.PROVIDER_PREFERENCE if p in usable), None)
        if "fabric" in built else None,
    }
    left = shm_segments.stale()
    out["stale_shm_segments"] = {"count": len(left), "bytes": sum(s.bytes_used for s in left),
                                 "paths": [s.path for s in left]}
    if selftest and "fabric" in built:
        wanted = [p for p in transports.PROVIDER_PREFERENCE if p in usable]
        out["selftest"] = [_selftest(p) for p in wanted]
    return out


def _print(r: dict[str, Any]) -> None:
    lf = r["libfabric"]
    print(f"kvtransfer {r['kvtransfer']}; transports built: {', '.join(r['transports_built'])}")
    if lf["error"]:
        print(f"libfabric: not available: {lf['error']}")
    else:
        print(f"libfabric {lf['version']} from {lf['loaded']}")
    for k, v in lf["env"].items():
        print(f"  {k}={v}")
    if r["fabric_providers"]:
        print("\nfabric providers (FI_EP_RDM with RMA):")
        print(f"  {'provider':<14} {'use':<4} {'read':<5} {'hmem':<5} {'tx':>5} {'iov':>7} "
              f"{'cq_data':>7} {'progress':<8} {'mr_mode':<22} domains")
        for p in r["fabric_providers"]:
            use = "yes" if p["usable"] else "no"
            print(f"  {p['name']:<14} {use:<4} {str(p['rdma_read']).lower():<5} "
                  f"{str(p['hmem']).lower():<5} {p['tx_depth']:>5} "
                  f"{p['iov_limit']:>3}/{p['rma_iov_limit']:<3} {p['cq_data_size']:>7} "
                  f"{p['data_progress']:<8} {','.join(p['mr_mode']) or '-':<22} "
                  f"{', '.join(p['domains'])}")
            if p["why_not"]:
                print(f"    not usable: {p['why_not']}")
    devs = r["verbs_devices"]
    print("\nverbs devices: " + (", ".join(d.get("name", "?") + f" ({d['source']})" for d in devs)
                               if devs else "none"))
    pick = r["pick"]
    a = pick["auto"]
    print(f"\ntransport='auto' -> {a['transport']}"
          + (f" (provider {a['provider']})" if a["provider"] else "") + f": {a['reason']}")
    if pick["fabric_default"]:
        print(f"transport='fabric' with no provider -> {pick['fabric_default']}")
    shm = r["stale_shm_segments"]
    if shm["count"]:
        print(f"\n{shm['count']} shm segment(s) of killed processes in /dev/shm hold "
              f"{shm['bytes'] / 2**20:.1f} MiB: `kvtransfer doctor --clean-shm` removes them")
    for t in r.get("selftest", []):
        if "error" in t:
            print(f"selftest {t['provider']}: FAILED {t['error']}")
        else:
            print(f"selftest {t['provider']}: write {t['write']}, read {t['read']} "
                  f"({t['seconds']} s)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="kvtransfer doctor", description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    ap.add_argument("--selftest", action="store_true",
                    help="also move bytes through each usable fabric provider on loopback")
    ap.add_argument("--clean-shm", action="store_true",
                    help="remove the shm segments of processes that no longer exist (not where "
                         "/dev/shm is shared across pid namespaces)")
    args = ap.parse_args(argv)
    if args.clean_shm:
        count, freed = shm_segments.remove(shm_segments.stale())
        print(f"removed {count} stale shm segment(s), {freed / 2**20:.1f} MiB freed",
              file=sys.stderr if args.json else sys.stdout)
    r = report(selftest=args.selftest)
    if args.json:
        json.dump(r, sys.stdout, indent=2)
        print()
    else:
        _print(r)
    failed = any("error" in t for t in r.get("selftest", []))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
