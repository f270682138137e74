"""Attribution methods. Public names are re-exported by :mod:`tdfunc`."""
