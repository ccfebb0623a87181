"""composefs-rs's transforms and SELinux labelling on small hand-built trees.

The golden trees (tests/test_rs_trees.py) show the transforms agree with cfsctl;
these pin down each rule on its own, and what hostile trees and policies do.
"""

from __future__ import annotations

import stat

import pytest

from composefsd.image.dump_print import format_rs_dump
from composefsd.image.selabel import POLICY_FILE_MAX, Policy, parse_config, selabel
from composefsd.image.transforms import (
    CFSCTL_DEFAULT,
    Transform,
    TransformError,
    TransformErrorKind,
    XattrFilter,
    apply_transform,
    relink,
)
from composefsd.image.tree import Node, new_directory

SEL = b"security.selinux"


def directory(mode: int = 0o755, mtime: int = 0, **children: Node) -> Node:
    node = new_directory(stat.S_IFDIR | mode)
    node.mtime_sec = mtime
    for name, child in children.items():
        node.add_child(name.encode(), child)
    return node


def add(parent: Node, path: bytes, node: Node) -> Node:
    """Put ``node`` at ``path`` (its directories must exist)."""
    *dirs, name = path.strip(b"/").split(b"/")
    for d in dirs:
        assert parent.children is not None
        parent = parent.children[d]
    parent.add_child(name, node)
    return node


def file(content: bytes = b"x", mode: int = 0o644) -> Node:
    node = Node(stat.S_IFREG | mode)
    node.set_content(content)
    return node


def link(target: Node) -> Node:
    return Node(mode=target.mode, link_to=target)


def read(node: Node) -> bytes:
    return node.content or b""


def label(root: Node, path: bytes) -> bytes | None:
    node = root
    for name in path.strip(b"/").split(b"/"):
        if name:
            assert node.children is not None
            node = node.children[name].target()
    return node.get_xattr(SEL)


def rootfs() -> Node:
    root = directory(mtime=1)
    usr = add(root, b"/usr", directory(0o700, mtime=50))
    usr.uid, usr.gid, usr.mtime_nsec = 7, 8, 9
    usr.set_xattr(b"user.u", b"1")
    usr.set_xattr(b"security.capability", b"cap")
    for name in (b"/boot", b"/sysroot", b"/run", b"/etc", b"/etc/selinux"):
        add(root, name, directory(mtime=100))
    root.children[b"boot"].mtime_nsec = 5  # type: ignore[index]
    add(root, b"/boot/vmlinuz", file(b"kernel"))
    add(root, b"/sysroot/x", file())
    add(root, b"/run/stale", file())
    return root


def with_policy(root: Node, contexts: bytes, subs: bytes | None = None) -> Node:
    add(root, b"/etc/selinux/config", file(b"SELINUX=enforcing\n SELINUXtype = pol \n"))
    add(root, b"/etc/selinux/pol", directory())
    add(root, b"/etc/selinux/pol/contexts", directory())
    add(root, b"/etc/selinux/pol/contexts/files", directory())
    add(root, b"/etc/selinux/pol/contexts/files/file_contexts", file(contexts))
    if subs is not None:
        add(root, b"/etc/selinux/pol/contexts/files/file_contexts.subs", file(subs))
    return root


# -- the OCI transform ----------------------------------------------------------------------


def test_identity_changes_nothing() -> None:
    root = rootfs()
    before = format_rs_dump(root)
    apply_transform(root, Transform(), read)
    assert format_rs_dump(root) == before


def test_default_copies_usr_to_root_empties_run_and_filters_xattrs() -> None:
    root = rootfs()
    root.set_xattr(b"user.root", b"r")
    run = root.children[b"run"]  # type: ignore[index]
    run.set_xattr(b"trusted.x", b"t")
    apply_transform(root, CFSCTL_DEFAULT, read)
    assert (root.mode, root.uid, root.gid) == (stat.S_IFDIR | 0o700, 7, 8)
    assert (root.mtime_sec, root.mtime_nsec) == (50, 9)
    assert root.xattrs == [(b"security.capability", b"cap")]
    assert run.children == {} and (run.mtime_sec, run.mtime_nsec) == (50, 9)
    assert run.xattrs == []
    usr = root.children[b"usr"]  # type: ignore[index]
    assert usr.xattrs == [(b"security.capability", b"cap")]


def test_keep_user_xattrs_keeps_user_and_capability_only() -> None:
    root = rootfs()
    f = add(root, b"/usr/f", file())
    for key in (b"user.a", b"trusted.b", b"security.selinux", b"security.capability"):
        f.set_xattr(key, b"v")
    apply_transform(root, Transform(True, XattrFilter.KEEP_USER_XATTRS), read)
    assert sorted(k for k, _ in f.xattrs) == [b"security.capability", b"user.a"]
    assert f.xattr_estimate == sum(7 + len(k) + len(v) for k, v in f.xattrs) + 12


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r.children.pop(b"usr"), 'Directory entry "usr" does not exist'),
        (
            lambda r: r.children.__setitem__(b"usr", file()),
            'Directory entry "usr" is not a subdirectory',
        ),
        (
            lambda r: r.children.__setitem__(b"run", file()),
            'Directory entry "run" is not a subdirectory',
        ),
    ],
)
def test_default_on_bad_trees_fails_as_cfsctl(change: object, message: str) -> None:
    root = rootfs()
    change(root)  # type: ignore[operator]
    with pytest.raises(TransformError) as info:
        apply_transform(root, CFSCTL_DEFAULT, read)
    assert str(info.value) == message


def test_emptied_run_moves_a_hardlinked_inode_to_its_next_path() -> None:
    root = rootfs()
    inode = root.children[b"run"].children[b"stale"]  # type: ignore[index]
    add(root, b"/usr/a", link(inode))
    add(root, b"/usr/b", link(inode))
    inode.nlink = 3
    apply_transform(root, CFSCTL_DEFAULT, read)
    usr = root.children[b"usr"]  # type: ignore[index]
    assert usr.children[b"a"] is inode and inode.nlink == 2  # type: ignore[index]
    assert usr.children[b"b"].link_to is inode  # type: ignore[index]


def test_relink_makes_the_first_path_the_inode() -> None:
    root = directory()
    inode = file(b"data")
    add(root, b"/z", inode)
    add(root, b"/a", link(inode))
    relink(root)
    assert root.children[b"a"] is inode and inode.nlink == 2  # type: ignore[index]
    assert root.children[b"z"].link_to is inode  # type: ignore[index]


# -- the boot transform ----------------------------------------------------------------------


def test_bootable_empties_boot_and_sysroot_keeping_nanoseconds() -> None:
    root = rootfs()
    apply_transform(root, Transform(bootable=True), read)
    boot = root.children[b"boot"]  # type: ignore[index]
    assert boot.children == {} and (boot.mtime_sec, boot.mtime_nsec) == (50, 5)
    assert root.children[b"sysroot"].children == {}  # type: ignore[index]
    # Without propagation /run stays.
    assert root.children[b"run"].children  # type: ignore[index]


@pytest.mark.parametrize("missing", [b"boot", b"sysroot"])
def test_bootable_needs_boot_and_sysroot(missing: bytes) -> None:
    root = rootfs()
    root.children.pop(missing)  # type: ignore[union-attr]
    with pytest.raises(TransformError) as info:
        apply_transform(root, Transform(bootable=True), read)
    assert info.value.kind is TransformErrorKind.NOT_FOUND and info.value.name == missing
    assert str(info.value) == f'Directory entry "{missing.decode()}" does not exist'


def test_without_policy_every_label_is_stripped() -> None:
    root = rootfs()
    f = add(root, b"/usr/f", file())
    f.set_xattr(SEL, b"old")
    f.set_xattr(b"user.keep", b"k")
    root.set_xattr(SEL, b"old")
    apply_transform(root, Transform(bootable=True), read)
    assert f.xattrs == [(b"user.keep", b"k")] and root.get_xattr(SEL) is None


def test_config_without_selinuxtype_means_no_policy() -> None:
    root = rootfs()
    add(root, b"/etc/selinux/config", file(b"SELINUX=disabled\n"))
    root.set_xattr(SEL, b"old")
    apply_transform(root, Transform(bootable=True), read)
    assert root.get_xattr(SEL) is None


def test_parse_config() -> None:
    assert parse_config(b"# c\nSELINUX=enforcing\n  selinuxType =  targeted  \n") == "targeted"
    assert parse_config(b"SELINUXTYPE\n") is None


POLICY = b"""# comment
/.*\tdefault_t
/usr(/.*)?\tusr_t
/usr/bin(/.*)?\tbin_t
/usr/bin/tool\t--\ttool_t
/usr/bin/link\t-l\tlink_t
/opt/none(/.*)?\t<<none>>
"""


def labelled(contexts: bytes = POLICY, subs: bytes | None = None) -> Node:
    root = rootfs()
    for path in (b"/usr/bin", b"/opt", b"/opt/none", b"/opt/alias"):
        add(root, path, directory())
    add(root, b"/usr/bin/tool", file())
    add(root, b"/usr/bin/link", Node(stat.S_IFLNK | 0o777, payload=b"tool", size=4))
    add(root, b"/usr/bin/other", file())
    add(root, b"/opt/alias/tool", file())
    gone = add(root, b"/opt/none/f", file())
    gone.set_xattr(SEL, b"stale")
    with_policy(root, contexts, subs)
    apply_transform(root, Transform(bootable=True), read)
    return root


def test_later_rules_win_and_types_select() -> None:
    root = labelled()
    assert label(root, b"/") == b"default_t"
    assert label(root, b"/usr") == b"usr_t"
    assert label(root, b"/usr/bin") == b"bin_t"
    assert label(root, b"/usr/bin/tool") == b"tool_t"
    assert label(root, b"/usr/bin/link") == b"link_t"
    assert label(root, b"/usr/bin/other") == b"bin_t"
    assert label(root, b"/etc/selinux/config") == b"default_t"


def test_none_removes_the_label() -> None:
    root = labelled()
    assert label(root, b"/opt/none") is None
    assert label(root, b"/opt/none/f") is None


def test_aliases_label_a_path_as_its_original() -> None:
    root = labelled(subs=b"# aliases\n\n/opt/alias /usr/bin\n")
    assert label(root, b"/opt/alias") == b"bin_t"
    assert label(root, b"/opt/alias/tool") == b"tool_t"
    assert label(labelled(), b"/opt/alias/tool") == b"default_t"


def test_a_later_spec_file_outranks_the_earlier() -> None:
    root = rootfs()
    with_policy(root, b"/.* a_t\n")
    add(root, b"/etc/selinux/pol/contexts/files/file_contexts.local", file(b"/usr b_t\n"))
    apply_transform(root, Transform(bootable=True), read)
    assert label(root, b"/usr") == b"b_t" and label(root, b"/boot") == b"a_t"


def test_hardlinks_with_different_labels_are_split_each_path_its_own() -> None:
    root = rootfs()
    for d in (b"/a", b"/b", b"/c"):
        add(root, d, directory())
    inode = add(root, b"/a/f", file(b"shared"))
    add(root, b"/b/f", link(inode))
    add(root, b"/b/g", link(inode))
    add(root, b"/c/f", link(inode))
    add(root, b"/c/g", link(inode))
    inode.nlink = 5
    with_policy(root, b"/.* d_t\n/b(/.*)? b_t\n")
    apply_transform(root, Transform(bootable=True), read)
    a, b, c = (root.children[n].children for n in (b"a", b"b", b"c"))  # type: ignore[index]
    assert a[b"f"] is inode and inode.nlink == 3  # type: ignore[index]
    assert c[b"f"].link_to is inode and c[b"g"].link_to is inode  # type: ignore[index]
    # The two /b paths share a label, yet each got a copy of its own, as in composefs-rs.
    assert b[b"f"] is not b[b"g"]  # type: ignore[index]
    for n in (b"f", b"g"):
        split = b[n]  # type: ignore[index]
        assert split.link_to is None and split.nlink == 1 and split.content == b"shared"
        assert split.get_xattr(SEL) == b"b_t"
    assert inode.get_xattr(SEL) == b"d_t"


# -- hostile policies ----------------------------------------------------------------------------


def boot_error(root: Node) -> TransformError:
    with pytest.raises(TransformError) as info:
        apply_transform(root, Transform(bootable=True), read)
    return info.value


@pytest.mark.parametrize(
    ("contexts", "words"),
    [
        (b"/usr\n", "missing separator after regex"),
        (b"/usr -x a_t\n", "invalid type code -x"),
        (b"/usr -- \n", "missing context field"),
        (b"/usr a_t extra\n", "trailing data"),
        (b"/usr( a_t\n", "bad regex"),
        (b"/u[[a]] a_t\n", "bad regex"),
        (b"/usr\xff a_t\n", "valid UTF-8"),
    ],
)
def test_malformed_spec_files_are_refused(contexts: bytes, words: str) -> None:
    err = boot_error(with_policy(rootfs(), contexts))
    assert err.kind is TransformErrorKind.POLICY and words in str(err)
    assert "file_contexts" in str(err)


def test_posix_classes_mean_what_they_mean_in_rust() -> None:
    policy = Policy()
    policy.add_spec(b"/[[:digit:]]+ num_t\n/x[^[:alpha:]] -- notalpha_t\n", "file_contexts")
    policy.finish()
    assert policy.lookup(b"/123", b"d") == "num_t"
    assert policy.lookup(b"/x1", b"-") == "notalpha_t"
    assert policy.lookup(b"/xa", b"-") is None


def test_malformed_subs_files_are_refused() -> None:
    err = boot_error(with_policy(rootfs(), POLICY, b"/only-alias\n"))
    assert "missing original path" in str(err)
    err = boot_error(with_policy(rootfs(), POLICY, b"/a /b /c\n"))
    assert "trailing data" in str(err)


@pytest.mark.parametrize("name", [b"..", b"../../etc", b"a/../b", b"."])
def test_policy_name_cannot_leave_etc_selinux(name: bytes) -> None:
    root = rootfs()
    add(root, b"/etc/selinux/config", file(b"SELINUXTYPE=" + name + b"\n"))
    err = boot_error(root)
    assert err.kind is TransformErrorKind.INVALID_FILENAME


def test_missing_policy_parts_are_errors() -> None:
    root = rootfs()
    add(root, b"/etc/selinux/config", file(b"SELINUXTYPE=gone\n"))
    assert str(boot_error(root)) == 'Directory entry "gone" does not exist'
    root = with_policy(rootfs(), b"")
    files = root.children[b"etc"].children[b"selinux"].children[b"pol"]  # type: ignore[index]
    files = files.children[b"contexts"].children[b"files"]  # type: ignore[index]
    files.children.pop(b"file_contexts")  # type: ignore[union-attr]
    assert "missing mandatory file_contexts" in str(boot_error(root))


def test_config_of_the_wrong_type_is_an_error() -> None:
    root = rootfs()
    add(root, b"/etc/selinux/config", directory())
    assert boot_error(root).kind is TransformErrorKind.IS_A_DIRECTORY
    root = rootfs()
    add(root, b"/etc/selinux/config", Node(stat.S_IFLNK | 0o777, payload=b"/x", size=2))
    assert boot_error(root).kind is TransformErrorKind.NOT_REGULAR
    root = rootfs()
    root.children[b"etc"] = file()  # type: ignore[index]
    assert str(boot_error(root)) == 'Directory entry "etc" is not a subdirectory'


def test_oversized_policy_files_are_not_read() -> None:
    root = with_policy(rootfs(), b"/.* a_t\n")
    fc = root.children[b"etc"].children[b"selinux"].children[b"pol"]  # type: ignore[index]
    fc = fc.children[b"contexts"].children[b"files"].children[b"file_contexts"]  # type: ignore[index]
    fc.set_content(None)
    fc.payload, fc.size = b"ab/cd", POLICY_FILE_MAX + 1
    calls: list[Node] = []

    def reader(node: Node) -> bytes:
        calls.append(node)
        return read(node)

    with pytest.raises(TransformError) as info:
        apply_transform(root, Transform(bootable=True), reader)
    assert "larger than" in str(info.value) and fc not in calls


def test_a_reader_returning_too_much_is_refused() -> None:
    root = with_policy(rootfs(), b"/.* a_t\n")
    with pytest.raises(TransformError) as info:
        apply_transform(root, Transform(bootable=True), lambda n: b"#" * (POLICY_FILE_MAX + 1))
    assert info.value.kind is TransformErrorKind.POLICY


def test_selabel_reports_whether_a_policy_applied() -> None:
    assert selabel(rootfs(), read) is False
    assert selabel(with_policy(rootfs(), b"/.* a_t\n"), read) is True


def test_names_in_messages_are_quoted_as_rust_debug_prints_them() -> None:
    err = TransformError(TransformErrorKind.NOT_FOUND, b'a\xffb"\n')
    assert str(err) == 'Directory entry "a\\xFFb\\"\\n" does not exist'
