from fastround._C import *  # noqa
