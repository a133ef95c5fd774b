"""Fan-in: live clients summed per upstream (``host:port``) across processes.

The failure the seed describes is not one process's leak but a fleet's clients converging on a
small service: each process holds a few, no process alarms, the upstream falls over. This sums
the per-process snapshots of a folder per upstream, with the processes, services and calling
sites behind each. At fleet scale the same sum is a Prometheus recording rule
(``deploy/prometheus/connwatch-rules.yml``), not a connwatch server.

Stdlib only: part of the core. Cost grows with call sites times upstreams, never with clients.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Set, Tuple

from ._snapshot import Snapshot

__all__ = ["by_upstream"]

SiteKey = Tuple[str, int, str, str]  # (file, line, function, kind label)


class _Upstream:
    __slots__ = ("live", "processes", "services", "sites")

    def __init__(self) -> None:
        self.live = 0
        self.processes: Set[Tuple[str, int]] = set()  # (host, pid)
        self.services: Set[str] = set()
        self.sites: Dict[SiteKey, List[int]] = {}  # -> [live, processes]


def by_upstream(snapshots: Iterable[Snapshot], top_sites: Optional[int] = None) -> List[Dict[str, Any]]:
    """Live clients per upstream across ``snapshots`` (one per process), biggest first.

    Each entry: ``upstream``, ``live``, ``processes`` (how many hold a live client to it),
    ``services`` (sorted) and ``callsites`` (file, line, function, kind, live, processes;
    biggest first, at most ``top_sites``). Clients with no known upstream are not counted.
    """
    ups: Dict[str, _Upstream] = {}
    for snap in snapshots:
        proc = (snap.host, snap.pid)
        for s in snap.stats:
            if not s.upstreams:
                continue
            site = s.site
            key: SiteKey = (site.file if site else "?", site.line if site else 0,
                            site.function if site else "?", s.label())
            for up, n in s.upstreams:
                if n <= 0:
                    continue
                u = ups.get(up)
                if u is None:
                    u = ups[up] = _Upstream()
                u.live += n
                u.processes.add(proc)
                if snap.service:
                    u.services.add(snap.service)
                row = u.sites.get(key)
                if row is None:
                    row = u.sites[key] = [0, 0, -1]
                row[0] += n
                if row[2] != id(snap):  # one process may hold the site's clients under several roles
                    row[1] += 1
                    row[2] = id(snap)
    out: List[Dict[str, Any]] = []
    for up, u in ups.items():
        sites = sorted(u.sites.items(), key=lambda kv: (-kv[1][0], kv[0]))
        if top_sites is not None:
            sites = sites[:top_sites]
        out.append({
            "upstream": up, "live": u.live, "processes": len(u.processes), "services": sorted(u.services),
            "callsites": [{"file": k[0], "line": k[1], "function": k[2], "kind": k[3], "live": v[0],
                           "processes": v[1]} for k, v in sites],
        })
    out.sort(key=lambda d: (-int(d["live"]), -int(d["processes"]), str(d["upstream"])))
    return out
