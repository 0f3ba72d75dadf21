"""What a URL in the config may be, checked before anything is loaded: fsspec URLs (`s3://`, `gs://`, `hdfs://`,
`file://`, ...) without credentials in them and with a filesystem installed for their scheme; and which files a
data folder holds. (Opening them is remote.py's.)"""

from __future__ import annotations

import os
import re
from typing import Any
from urllib.parse import urlsplit

from shardtune.errors import ConfigError

EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "hdfs": "hdfs", "viewfs": "hdfs"}
DATA_SUFFIXES = (".parquet", ".jsonl", ".json")  # the data files a folder holds (local or remote)


def is_url(path: Any) -> bool:
    return isinstance(path, str) and re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", path) is not None


def check_url(url: str, key: str) -> None:
    """Fail before anything is loaded when a URL cannot be used: credentials in it, or no fsspec backend."""
    import fsspec

    parts = urlsplit(url)
    if parts.password:
        raise ConfigError(f"{key} embeds credentials in its URL. Fix: remove them from the URL and give them the "
                          "way the filesystem reads them (e.g. AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, ~/.aws, "
                          "GOOGLE_APPLICATION_CREDENTIALS); shardtune never stores credentials.")
    if parts.scheme in ("hdfs", "viewfs") and not _libhdfs_found():
        raise ConfigError(f"{key}='{url}' needs pyarrow's HDFS client, which loads libhdfs from a Hadoop install, "
                          f"and none was found. Fix: {HDFS_SETUP}.")
    try:
        fsspec.get_filesystem_class(parts.scheme)
    except ValueError:
        raise ConfigError(f"{key}='{url}': fsspec knows no '{parts.scheme}://' filesystem.") from None
    except ImportError:
        extra = EXTRAS.get(parts.scheme)
        fix = f"pip install 'shardtune[{extra}]'" if extra else f"install the fsspec backend for {parts.scheme}://"
        raise ConfigError(f"{key}='{url}' needs the fsspec backend for {parts.scheme}://. Fix: {fix}.") from None


HDFS_SETUP = ("set HADOOP_HOME (or ARROW_LIBHDFS_DIR to the folder of libhdfs.so), JAVA_HOME, and "
              "CLASSPATH=$(hadoop classpath --glob)")


def _libhdfs_found() -> bool:
    """Where pyarrow looks for libhdfs: ARROW_LIBHDFS_DIR, $HADOOP_HOME/lib/native, the library path."""
    import ctypes.util

    home = os.environ.get("HADOOP_HOME")
    folders = [os.environ.get("ARROW_LIBHDFS_DIR"), home and os.path.join(home, "lib", "native")]
    return any(f and os.path.isfile(os.path.join(f, "libhdfs.so")) for f in folders) or bool(
        ctypes.util.find_library("hdfs"))
