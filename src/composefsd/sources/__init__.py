"""Where an image's tree and its file contents come from.

A source reads something a caller names into a
:class:`~composefsd.sources.base.SourceTree`: the :class:`~composefsd.image.tree.Node`
tree of the image, the files whose contents go into the object store
(:class:`~composefsd.sources.base.ImportTask`, each with the node it fills), and
what they are read beneath (a directory fd, its name for messages, the rights to
open them with). The repository takes it from there, the same way for every source
(:func:`composefsd.repository.images.create_from_directory` and its siblings):
import the files, write the image, publish it.

The sources:

* :mod:`~composefsd.sources.directory`: a directory tree, scanned as C
  ``mkcomposefs`` does or, with ``ScanOptions.style``
  (:class:`~composefsd.sources.base.ReadStyle`), as composefs-rs does
  (:func:`~composefsd.sources.directory.scan_source`, then
  :func:`~composefsd.sources.directory.source_tree`); composefs-rs's transforms
  of the tree read are :mod:`composefsd.image.transforms`;
* :mod:`~composefsd.sources.dumpfile`: a composefs dumpfile whose files name
  objects in a directory (:func:`~composefsd.sources.dumpfile.dumpfile_tree`).

Adding a source (an OCI layer tar, say) is one module here with one function that
returns a ``SourceTree`` (raising :class:`~composefsd.sources.base.SourceTreeError`
for a bad source), plus the ``create_from_...`` entry point in the repository that
opens the source and hands the tree on. Sources sit below the repository: they
import only :mod:`composefsd.image`, the hashing and object-layout modules,
:mod:`composefsd.credentials`, :mod:`composefsd.workerproc` (worker processes),
the kernel's leaf modules and each other.

Shared by the sources: :mod:`~composefsd.sources.beneath` reopens a scanned tree's
files only beneath its root fd and only if they are the inodes scanned;
:mod:`~composefsd.sources.objcopy` copies file contents into a store.
"""
