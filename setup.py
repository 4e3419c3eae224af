"""Package list for setuptools: maps the top-level envs/, policies/ and conf/ into rlplat.*.

Everything else lives in pyproject.toml; this file only exists because a static package list
cannot express "every sub-package of envs/ installs under rlplat.envs".
"""

from setuptools import find_packages, setup

_MAPPED = {"rlplat.envs": "envs", "rlplat.policies": "policies", "rlplat.conf": "conf"}

packages = find_packages(include=["rlplat", "rlplat.*"])
package_dir = {"rlplat": "rlplat"}
for name, folder in _MAPPED.items():
    packages.append(name)
    package_dir[name] = folder
    for sub in find_packages(where=folder):
        packages.append(f"{name}.{sub}")
        package_dir[f"{name}.{sub}"] = f"{folder}/{sub.replace('.', '/')}"

setup(packages=packages, package_dir=package_dir)
