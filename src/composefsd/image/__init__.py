"""Pure composefs image core: tree model, dumpfiles, EROFS writer and reader.

Nothing here opens files or calls the kernel: bytes and trees in, bytes and trees out.
"""
