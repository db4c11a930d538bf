"""``logsluice demo --serve``: the demo app with the viewer mounted at /logs, kept running.
Prints the URL and the token that protects the viewer; some traffic is sent at start so
there is something to look at."""

from __future__ import annotations

import os
import secrets
import threading
import time
from typing import Any


def serve(args: Any) -> int:
    try:
        import uvicorn
    except ImportError:
        print("logsluice demo --serve needs FastAPI and uvicorn: pip install fastapi uvicorn")
        return 2
    from . import Reader
    from ._demo_app import create_app, drive_traffic
    from ._pipeline import Pipeline
    from .viewer import token_auth, viewer

    if args.dir:
        os.environ["LOGSLUICE_DIR"] = args.dir
    pipeline = Pipeline.from_env()
    reader = Reader.from_env()
    token = secrets.token_urlsafe(24)
    app = create_app(pipeline, exclude=["/logs*"])
    app.mount("/logs", viewer(reader, auth=token_auth(token), pipeline=pipeline))
    from loguru import logger

    logger.remove()
    pipeline.attach(logger, level="INFO")

    host, port = "127.0.0.1", args.port
    base = f"http://{host}:{port}"
    # "critical": the demo's /boom endpoint raises on purpose; its traceback is in the viewer,
    # not on this console under the URL.
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="critical"))

    def traffic() -> None:
        while not server.started and not server.should_exit:
            time.sleep(0.05)
        if server.started:
            # Printed once the port listens, so the URL works as soon as it shows.
            print(f"viewer:  {base}/logs/?token={token}")
            print(
                f"token:   {token}   (API: curl -H 'Authorization: Bearer {token}' {base}/logs/api/records)"
            )
            print("Ctrl-C to stop.", flush=True)
            try:
                drive_traffic(base, requests=100, upload_bytes=256 * 1024)
            except Exception as e:  # noqa: BLE001 - the demo goes on without it
                print(f"demo traffic stopped: {type(e).__name__}")

    threading.Thread(target=traffic, daemon=True).start()
    print(f"logsluice demo app on {base} (destinations: {', '.join(repr(d) for d in pipeline.destinations)})")
    print("starting…", flush=True)
    server.run()
    pipeline.close()
    return 0
