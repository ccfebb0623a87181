"""Where an image's tree and its file contents come from.

A source reads something a caller names (a directory tree today) into a
:class:`~composefsd.image.tree.Node` tree plus the files whose contents go into
the object store. :mod:`~composefsd.sources.beneath` reopens a scanned tree's
files only beneath its root fd and only if they are the inodes scanned;
:mod:`~composefsd.sources.objcopy` copies file contents into a store.
"""
