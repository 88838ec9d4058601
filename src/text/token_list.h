// Token ids written as text: "5,17,3" (`--tokens`), and a batch file of such lists, one prompt per
// line (`dsv3 generate --batch-file`). Untrusted input: every malformed item is an error naming it.
#ifndef DSV3_TEXT_TOKEN_LIST_H
#define DSV3_TEXT_TOKEN_LIST_H

#include "base/error.h"

// "5,17,3" (spaces allowed around items) → malloc'd ids; an empty list, a malformed or negative id,
// or an id past INT32_MAX is an error naming the item.
int token_list_parse(const char *s, int **out, int *n, Error *err);

// A batch file: one comma-separated id list per line (CRLF accepted). *lines gets n malloc'd lists
// (free with token_lists_free), *lens their lengths; an empty or malformed line is an error naming
// the file and the line, and an empty file one naming the file.
int token_lists_read(const char *path, int ***lines, int **lens, int *n, Error *err);
// The same over text in memory (NUL-terminated; modified: lines are cut in place); `name` is the
// source the errors name.
int token_lists_parse(char *text, const char *name, int ***lines, int **lens, int *n, Error *err);
void token_lists_free(int **lines, int *lens, int n);

#endif
