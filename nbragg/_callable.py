"""A module that is also its main function (``nbragg.refine``, ``nbragg.refine_many``).

Importing the module ``nbragg.refine`` (say, for RefinementError) binds the module to the
package's attribute of the same name, shadowing the function; so such a module calls its
function, shows its signature and pickles as it."""

import importlib
import inspect
import sys
import types


def _function(module, name):
    return getattr(importlib.import_module(module), name)


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return getattr(self, self.__callable_name__)(*args, **kwargs)

    def __reduce__(self):
        return (_function, (self.__name__, self.__callable_name__))


def make_callable(module_name, function_name):
    module = sys.modules[module_name]
    module.__class__ = _CallableModule
    module.__callable_name__ = function_name
    function = getattr(module, function_name)
    module.__signature__ = inspect.signature(function)
    module.__wrapped__ = function
