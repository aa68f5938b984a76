"""The paper: its numbers as data, the comparison formatter, training-curve plots in its style,
and Fig. 7's layer responses."""
