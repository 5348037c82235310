# listmatch.pxi: in progress
