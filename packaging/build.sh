#!/usr/bin/env bash
# Build the imaged distribution packages.
#
#     packaging/build.sh deb [OUTDIR]    .deb via dpkg-buildpackage, then lintian
#     packaging/build.sh rpm [OUTDIR]    noarch .rpm via rpmbuild
#
# OUTDIR defaults to dist/. Builds run in a temporary copy of the source
# tree (the files git knows about, committed or not, minus ignored ones),
# so nothing is written into the tree but OUTDIR, and a build from a
# working tree matches a build from a clean clone of the same files.
#
# Environment: LINTIAN=0 skips lintian after a deb build (it fails the build
# on lintian errors otherwise, and is skipped with a note when not installed).
set -euo pipefail

usage() { echo "usage: $0 deb|rpm [OUTDIR]" >&2; exit 2; }
[ $# -ge 1 ] || usage
kind=$1
top=$(cd "$(dirname "$0")/.." && pwd)
outdir=$(mkdir -p "${2:-$top/dist}" && cd "${2:-$top/dist}" && pwd)

version=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$top/imaged/__init__.py")
[ -n "$version" ] || { echo "cannot read __version__ from imaged/__init__.py" >&2; exit 1; }

work=$(mktemp -d "${TMPDIR:-/tmp}/imaged-build.XXXXXX")
trap 'rm -rf "$work"' EXIT

# Copy the source tree to $1 without build products, venvs or VCS data.
export_tree() {
    local dest=$1
    mkdir -p "$dest"
    if git -C "$top" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
        # --ignore-failed-read: a tracked file deleted in the working tree
        # is simply left out.
        git -C "$top" ls-files -z --cached --others --exclude-standard \
            | tar -C "$top" --null --ignore-failed-read -T - -cf - 2>/dev/null \
            | tar -C "$dest" -xf -
    else
        tar -C "$top" -cf - --exclude=.git --exclude=.venv --exclude=build \
            --exclude=dist --exclude=lab --exclude='*.egg-info' \
            --exclude=__pycache__ --exclude=.pytest_cache . | tar -C "$dest" -xf -
    fi
}

build_deb() {
    local changelog_version
    changelog_version=$(dpkg-parsechangelog -l "$top/packaging/debian/changelog" -S Version)
    if [ "${changelog_version%-*}" != "$version" ]; then
        echo "packaging/debian/changelog is at $changelog_version but imaged is $version:" \
             "add a changelog entry (dch -v $version-1)" >&2
        exit 1
    fi
    local src=$work/imaged-$version
    export_tree "$src"
    # SPEC keeps the Debian files in packaging/debian; dpkg wants debian/.
    # The unit, sysusers and tmpfiles files are shared with the RPM; give
    # them the names debhelper looks for.
    cp -r "$src/packaging/debian" "$src/debian"
    cp "$src/packaging/systemd/imaged.service" "$src/debian/imaged.service"
    cp "$src/packaging/systemd/imaged.sysusers" "$src/debian/imaged.sysusers"
    cp "$src/packaging/systemd/imaged.tmpfiles" "$src/debian/imaged.tmpfiles"
    (cd "$src" && dpkg-buildpackage -us -uc -b)
    local deb
    deb=$(ls "$work"/imaged_*_all.deb)
    cp "$deb" "$work"/imaged_*.buildinfo "$work"/imaged_*.changes "$outdir"/
    echo "built $outdir/$(basename "$deb")"

    if [ "${LINTIAN:-1}" = 0 ]; then
        return
    fi
    if ! command -v lintian >/dev/null; then
        echo "lintian is not installed: not checked (make packaging-deps installs it)"
        return
    fi
    # Root cannot be avoided on CI; lintian only warns about it.
    local log=$outdir/lintian.txt
    local rc=0
    lintian --fail-on error --allow-root "$outdir/$(basename "$deb")" >"$log" 2>&1 || rc=$?
    cat "$log"
    if [ "$rc" != 0 ]; then
        echo "lintian found errors (see above)" >&2
        exit 1
    fi
    echo "lintian: no errors"
}

build_rpm() {
    local spec=$top/packaging/rpm/imaged.spec
    local spec_version
    spec_version=$(sed -n 's/^Version:[[:space:]]*//p' "$spec")
    if [ "$spec_version" != "$version" ]; then
        echo "packaging/rpm/imaged.spec is at $spec_version but imaged is $version" >&2
        exit 1
    fi
    local rpmtop=$work/rpmbuild
    mkdir -p "$rpmtop"/{SOURCES,SPECS,BUILD,RPMS,SRPMS}
    export_tree "$work/imaged-$version"
    tar -C "$work" -czf "$rpmtop/SOURCES/imaged-$version.tar.gz" "imaged-$version"
    cp "$top"/packaging/systemd/imaged.{service,sysusers,tmpfiles} "$rpmtop/SOURCES/"
    # BuildRequires name RPM packages; where rpm itself is no RPM package
    # (rpmbuild on Debian) nothing could satisfy them: skip the check. The
    # spec falls back to plain commands for macros such a host lacks.
    local nodeps=()
    if ! rpm -q rpm >/dev/null 2>&1; then
        nodeps=(--nodeps)
    fi
    rpmbuild -bb "${nodeps[@]}" --define "_topdir $rpmtop" "$spec"
    local rpm
    for rpm in "$rpmtop"/RPMS/noarch/*.rpm; do
        cp "$rpm" "$outdir"/
        echo "built $outdir/$(basename "$rpm")"
    done
}

case $kind in
    deb) build_deb ;;
    rpm) build_rpm ;;
    *) usage ;;
esac
