"""Print pip constraints that pin every runtime requirement of a wheel to its
lower bound (`numpy>=1.24` -> `numpy==1.24`): the oldest versions the package
claims to work with, for .ci/run to install and test.

usage: python lowest_versions.py WHEEL
"""
import email
import re
import sys
import zipfile

with zipfile.ZipFile(sys.argv[1]) as wheel:
    name = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
    metadata = email.message_from_string(wheel.read(name).decode())
for requirement in metadata.get_all("Requires-Dist"):
    if "extra ==" in requirement:
        continue
    bound = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9][0-9.]*)", requirement.replace(" ", ""))
    if not bound:
        sys.exit(f"error: {requirement!r} has no single lower bound to test")
    print(f"{bound[1]}=={bound[2]}")
