"""Calls keywords on a Robot Framework remote server the way Robot itself does,
through robot.libraries.Remote, and prints one JSON object per call.

Usage: python3 call_keywords.py URL COUNT
"""
import json
import sys

from robot.libraries.Remote import Remote

url, count = sys.argv[1], int(sys.argv[2])
remote = Remote(url, timeout=30)
print(json.dumps({"keywords": sorted(remote.get_keyword_names())}))
for i in range(count):
    receipt = remote.run_keyword("process_invoice", [f"inv-{i}", "100"], {})
    print(json.dumps({"call": i, "receipt": receipt}))
try:
    remote.run_keyword("fail_on_purpose", ["boom"], {})
    print(json.dumps({"failure": None}))
except Exception as error:  # Robot raises the remote failure as an exception
    print(json.dumps({"failure": str(error)}))
