"""Run the manager's release pipeline on a list of archives, as an update does, and say what came
out. Used by tests/test_exact_extraction.py under each interpreter the manager supports (Debian's
/usr/bin/python3 has no pytest, so the pipeline runs here, in a plain subprocess).

    PYTHON tests/unpack_driver.py JOBS.json

JOBS.json:
    {"manager": "/path/to/backend_ai_manager.py",    # optional: the repo's by default
     "results": "/path/to/results.json",             # optional: JOBS.json + ".results" by default
     "jobs": [{"id": "a00042", "url": "http://127.0.0.1:PORT/api/raw/...", "dest": "/new/dir",
               "chunk": 7, "in_chunk": 13, "small": 0,  # optional: the buffer constants
               "timeout": 60,                           # optional: seconds for the job
               "max_download": ..., "max_unpacked": ..., "max_members": ...,
               "max_file": ...}, ...]}                  # optional: limits (1 GiB, 2**20)

For each job: set the constants given (the others back to the module's own values), open the URL
with open_url, run unpack_release into `dest` (which must not exist) and record
{"ok": true, "root": ..., "files": n} or {"ok": false, "error": str(e), "type": class name}.
An exception other than ReleaseError is recorded the same way, with its traceback: the test fails
on its type. Standard library only.
"""

import importlib.util
import json
import os
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_MANAGER = os.path.join(os.path.dirname(HERE), "backend_ai_manager.py")

LIMIT = 1 << 30


def load_manager(path):
    spec = importlib.util.spec_from_file_location("backend_ai_manager", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["backend_ai_manager"] = module
    spec.loader.exec_module(module)
    return module


def run_job(bam, job, defaults):
    bam.CHUNK = job.get("chunk") or defaults["chunk"]
    bam.Gunzip.IN_CHUNK = job.get("in_chunk") or defaults["in_chunk"]
    small = job.get("small")
    bam.Extractor.SMALL = defaults["small"] if small is None else small
    used = {"chunk": bam.CHUNK, "in_chunk": bam.Gunzip.IN_CHUNK, "small": bam.Extractor.SMALL}
    timeout = job.get("timeout", 120)
    started = time.monotonic()
    response = None
    try:
        response = bam.open_url(job["url"], timeout)
        root, download, files = bam.unpack_release(
            response, job["dest"], time.monotonic() + timeout,
            job.get("max_download", LIMIT), job.get("max_unpacked", LIMIT),
            job.get("max_members", 1 << 20), job.get("max_file", LIMIT))
        result = {"ok": True, "root": root, "files": files, "download": download.count}
    except bam.ReleaseError as e:
        result = {"ok": False, "error": str(e), "type": type(e).__name__}
    except Exception as e:  # anything else is a bug the test reports
        result = {"ok": False, "error": str(e), "type": type(e).__name__,
                  "traceback": traceback.format_exc()}
    finally:
        if response is not None:
            response.close()
    result.update(id=job.get("id"), constants=used,
                  seconds=round(time.monotonic() - started, 4))
    return result


def main(argv):
    if len(argv) != 2:
        print(f"usage: {argv[0]} JOBS.json", file=sys.stderr)
        return 2
    with open(argv[1]) as f:
        spec = json.load(f)
    manager = spec.get("manager") or REPO_MANAGER
    bam = load_manager(manager)
    defaults = {"chunk": bam.CHUNK, "in_chunk": bam.Gunzip.IN_CHUNK, "small": bam.Extractor.SMALL}
    started = time.monotonic()
    results = [run_job(bam, job, defaults) for job in spec["jobs"]]
    out = {"manager": os.path.abspath(manager), "python": sys.version.split()[0],
           "executable": sys.executable, "defaults": defaults, "results": results,
           "seconds": round(time.monotonic() - started, 3)}
    path = spec.get("results") or argv[1] + ".results"
    with open(path + ".part", "w") as f:
        json.dump(out, f)
    os.replace(path + ".part", path)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
